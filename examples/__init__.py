"""Examples for lightning-gmc: DataModules, partitioning, models and scripts for the GMC paper's experiments.

Importable modules:

* :mod:`examples.partition`: IID and non-IID Dirichlet partitions across ranks (replaces
  ``DistributedSampler``).
* :mod:`examples.data`: CIFAR-10/100 (torchvision or generated), scikit-learn digits and synthetic
  DataModules.
* :mod:`examples.models`: ResNet-20 (BN/GN), the 4-block ViT of Lee et al., small digits models and
  :class:`~examples.models.ClassificationModule`.

Scripts: ``examples/toy_quadratic.py`` (the quadratic toy problem of the paper, reconstructed).
"""
