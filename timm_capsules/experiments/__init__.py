"""The paper's studies as data and code: the recipes and their prose (``protocols``), the runs of each scale
(``plans``), a run to its record (``runner``), the records (``records``), differences over seeds (``intervals``),
the report of docs/results.md (``report``, ``plots``) and the GPU budget (``budget``). ``experiments.py`` at the
checkout's root is their command line."""
