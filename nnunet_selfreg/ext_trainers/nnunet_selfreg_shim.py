"""Shim module for nnU-Net's ``nnUNet_extTrainer`` lookup (see ``nnunet_selfreg._discovery``).

nnU-Net imports every module of this folder under a top-level name and drops it from
``sys.modules`` afterwards; the absolute imports below keep the trainer classes in
``nnunet_selfreg.trainers`` so that they stay one class object each and pickle correctly. The
module-level ``__getattr__`` answers variant names of any trainer nnU-Net finds (``X_Rep2``,
``X_100epochs``, ``X_Budget``; ``nnunet_selfreg.trainers.on_demand``).
Do not put anything else in this folder: one module that fails to import stops nnU-Net's search.
"""

from nnunet_selfreg.trainers import *  # noqa: F401,F403
from nnunet_selfreg.trainers.on_demand import __getattr__  # noqa: F401
