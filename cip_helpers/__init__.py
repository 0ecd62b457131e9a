"""cip_helpers: the tested package behind the CIP course notebooks.

Modules by concept: ``config`` (profiles), ``data``, ``models``, ``training``, ``scores``,
``pipeline`` (load-or-train stages), ``defenses``, ``attacks``, ``verification``, ``plots``,
``store`` (artifacts) and ``run`` (the papermill runner). Import what you need, e.g.
``from cip_helpers import config, pipeline``; importing the package has no side effects.
"""
__version__ = "0.1.0"
