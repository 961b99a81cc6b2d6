"""Everything that measures the pipeline rather than runs it: metrics (``metrics``), evaluation cases (``cases``:
the real Slovakia pair and the simulated set; ``romania``: the real 140-date stack through the catalog path),
running and scoring models (``running``), the report and its tables (``report``), figures (``figures``), the
``cloudfree evaluate`` orchestration (``evaluate``), the simulated-cloud generator (``simulate``), scoring an
output against a truth asset (``truth``), mask scores (``mask_scores``), benchmarks (``bench``,
``bench_models``) and the embedded demo-catalog builder (``demo_catalog``). The data-flow packages
(``catalogs``, ``stages``, ``models``) never import from here (tests/test_import_rules.py).

Held-out dates: :data:`cloudfree.pipeline.evaluation.cases.ROMANIA_EVAL_DATES`; training data for learned models must
exclude them.
"""
