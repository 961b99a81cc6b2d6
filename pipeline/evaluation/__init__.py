"""Everything that measures the pipeline rather than runs it: metrics and evaluation cases (``evaluate``), the
simulated-cloud generator (``simulate``), scoring an output against a truth asset (``truth``), mask scores
(``mask_scores``), benchmarks (``bench``, ``bench_models``) and the embedded demo-catalog builder
(``demo_catalog``). The data-flow packages (``catalogs``, ``stages``, ``models``) never import from here.
"""
