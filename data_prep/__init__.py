"""Download and lay out the datasets of the ``full`` profile (``python -m data_prep.fetch``).

See ``data_prep/README.md`` for what is fetched, what must be downloaded by hand and the layout
read by :mod:`cip_helpers.course.data_full`.
"""
