"""Glue between the ``anomaly`` library and the Streamlit dashboard (``streamlit run dashboard.py``).

The library stays free of Streamlit; this package holds what the pages share so that
each page reads top to bottom:

* :mod:`.cache`     shared immutable resources (backbone, banks) and content-keyed results;
* :mod:`.session`   what one browser session has built (bank, scored batch, thresholds);
* :mod:`.workflows` the multi-step actions (build/load a bank, score, run the demo);
* :mod:`.widgets`   reusable controls (synced thresholds, pagination, input pickers, image grids);
* :mod:`.figures`   plotly figures; :mod:`.render` pictures as arrays; :mod:`.tables` result tables;
* :mod:`.findings`  dataset sanity checks; :mod:`.progress` progress bars with counts;
* :mod:`.entry`     makes every page run inside dashboard.py's navigation.
"""
