"""The course around the method: profiles (``config``), data and query pools (``data``,
``data_full``), artifacts and load-or-train (``store``), training loops (``training``), the
load-or-train stages the notebooks share (``pipeline``), the attack harness (``attacks``,
``dfme``), progress lines (``progress``) and figures (``plots``). Imports
:mod:`cip_helpers.method`, never :mod:`cip_helpers.tools`.
"""
