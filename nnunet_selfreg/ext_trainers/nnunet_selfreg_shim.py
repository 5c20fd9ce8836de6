"""Shim module for nnU-Net's ``nnUNet_extTrainer`` lookup (see ``nnunet_selfreg._discovery``).

nnU-Net imports every module of this folder under a top-level name and drops it from
``sys.modules`` afterwards; the absolute import below keeps the trainer classes in
``nnunet_selfreg.trainers`` so that they stay one class object each and pickle correctly.
Do not put anything else in this folder: one module that fails to import stops nnU-Net's search.
"""

from nnunet_selfreg.trainers import *  # noqa: F401,F403
