"""cip_helpers: the tested package behind the CIP course notebooks.

Modules by concept: ``config`` (profiles), ``data``, ``models``, ``training``, ``scores``,
``pipeline`` (load-or-train stages), ``defenses``, ``attacks``, ``verification``, ``plots``,
``store`` (artifacts) and ``run`` (the papermill runner). Import what you need, e.g.
``from cip_helpers import config, pipeline``; importing the package has no side effects.
"""
__version__ = "0.1.0"

CITATION = ("Haitian Zhang, Guang Hua, Xinya Wang, Hao Jiang, Wen Yang. Categorical Inference Poisoning: "
            "Verifiable Defense Against Black-Box DNN Model Stealing Without Constraining Surrogate Data "
            "and Query Times. IEEE Transactions on Information Forensics and Security, vol. 18, 2023. "
            "doi:10.1109/TIFS.2023.3244107")
"""The paper this course reproduces (the authors' code release: github.com/Hatins/CIP_master)."""
