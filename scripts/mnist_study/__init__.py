"""The MNIST-scale Table 1 study (issue 20; paper arXiv 2603.06351 §4): run plan, training,
evaluation, verdict rules and report. ``scripts/reproduce_mnist.py`` is its command line."""
