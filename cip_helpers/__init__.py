"""cip_helpers: the tested package behind the CIP course notebooks, in three layers.

* :mod:`cip_helpers.method`: the paper's mechanism over tensors (energy score and OE loss,
  thresholds and routing, PPD, reliability score, PBD, the CIP / DP / DAWN APIs, the ownership
  test, the models). No profiles, no files, no caching: start reading here.
* :mod:`cip_helpers.course`: what the notebooks need around it (profiles, data and query pools,
  load-or-train with content addressing, training loops, the attack harness, figures).
* :mod:`cip_helpers.tools`: the runner, the results/README writer and the ART door.

Each layer imports only the layers above it in this list, never a later one. Import what you
need, e.g. ``from cip_helpers.method import scores``; importing a package has no side effects.
"""
__version__ = "0.1.0"

CITATION = ("Haitian Zhang, Guang Hua, Xinya Wang, Hao Jiang, Wen Yang. Categorical Inference Poisoning: "
            "Verifiable Defense Against Black-Box DNN Model Stealing Without Constraining Surrogate Data "
            "and Query Times. IEEE Transactions on Information Forensics and Security, vol. 18, 2023. "
            "doi:10.1109/TIFS.2023.3244107")
"""The paper this course reproduces (the authors' code release: github.com/Hatins/CIP_master)."""
