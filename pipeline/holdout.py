"""The dates of the Romania stack that evaluation uses, in one data module that evaluation and training both import.

:mod:`cloudfree.pipeline.evaluation.romania` builds its cases from them; :mod:`cloudfree.pipeline.training.datasets`
excludes :data:`ROMANIA_HELDOUT_DATES` from training and validation in every role (truth, target, cloud-mask
source, reference). One list, never two that drift; this module imports nothing.
"""

from __future__ import annotations

#: the real 140-date stack in ../shared/data and its collection id.
ROMANIA_FOLDER = "s2-l2a-stack-romania-nrt"
ROMANIA_COLLECTION = "s2-l2a-romania-nrt"
#: (hidden clear target date, cloud-mask donor date): clear dates (SCL not-clear <= 0.5 %) with clear dates on both
#: sides within 30 days, spread over 2016-2020 and the seasons; donors with 27-84 % SCL cloud, each used once.
ROMANIA_HIDDEN: tuple[tuple[str, str], ...] = (
    ("2016-04-07", "2015-08-01"), ("2017-06-21", "2016-12-13"), ("2017-07-11", "2017-08-30"),
    ("2017-08-05", "2018-03-28"), ("2017-09-14", "2018-05-12"), ("2017-10-04", "2018-07-06"),
    ("2018-04-27", "2018-07-26"), ("2018-07-21", "2018-08-05"), ("2018-08-25", "2018-08-20"),
    ("2018-10-04", "2019-06-26"), ("2019-07-01", "2019-07-31"), ("2019-10-09", "2019-08-05"),
    ("2020-05-11", "2019-08-30"), ("2020-07-10", "2019-09-04"), ("2020-08-04", "2020-07-30"),
    ("2020-09-13", "2019-09-14"),
)
#: real cloudy dates (19-92 % SCL cloud) with clear dates on both sides within 20 days (the proxy truth).
ROMANIA_REAL_CLOUDY: tuple[str, ...] = (
    "2017-08-30", "2018-05-12", "2018-07-06", "2018-07-26", "2018-08-05", "2018-08-20", "2018-08-30",
    "2019-06-21", "2019-06-26", "2019-08-30", "2019-09-04", "2020-09-23",
)
#: every evaluation target date: learned-model training must exclude them.
ROMANIA_EVAL_DATES: tuple[str, ...] = tuple(sorted({t for t, _ in ROMANIA_HIDDEN} | set(ROMANIA_REAL_CLOUDY)))
#: the donors whose real clouds hide the ROMANIA_HIDDEN targets.
ROMANIA_MASK_DATES: tuple[str, ...] = tuple(d for _, d in ROMANIA_HIDDEN)
#: the clear dates whose linear-in-time interpolation is the PROXY truth of the ROMANIA_REAL_CLOUDY set (the
#: nearest clear date before and after each real cloudy date, by :data:`cloudfree.pipeline.evaluation.romania.CLEAR_MAX_FRACTION`; checked against the
#: stack by tests/test_training.py). They are truths of the evaluation and are NOT in ROMANIA_EVAL_DATES: the
#: committed learned weights (trained with ROMANIA_EVAL_DATES + ROMANIA_MASK_DATES held out) saw 10 of them in
#: training, so their ``romania-real`` scores are not a clean hold-out.
ROMANIA_REAL_TRUTH_DATES: tuple[str, ...] = (
    "2017-08-15", "2017-09-14", "2018-05-02", "2018-05-22", "2018-07-01", "2018-07-21", "2018-08-15", "2018-08-25",
    "2018-09-19", "2019-06-16", "2019-07-01", "2019-08-20", "2019-09-19", "2020-09-13", "2020-10-03",
)
#: everything training must never see: the evaluation targets, the mask donors and the proxy-truth dates.
ROMANIA_HELDOUT_DATES: tuple[str, ...] = tuple(sorted(set(ROMANIA_EVAL_DATES) | set(ROMANIA_MASK_DATES)
                                                    | set(ROMANIA_REAL_TRUTH_DATES)))
