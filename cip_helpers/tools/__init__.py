"""Tools over the course: the notebook runner (``run``), the results tables, README block and
overview figure (``report``), and the door to other libraries (``interop``: numpy and ART).
"""
