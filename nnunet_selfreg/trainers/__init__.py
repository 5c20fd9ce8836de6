"""Our nnU-Net trainers. nnU-Net finds them by name through ``nnunet_selfreg/ext_trainers``.

Every module of this package is imported; each trainer class it marks with
:func:`nnunet_selfreg.trainers.core.register_trainer` is exported here under its name, with its
variants (``_Nepochs``, ``_Budget``, ``_Rep2`` / ``_Rep3`` where asked for). A new method's trainer
module therefore needs no edit of this file. Variant names of any other trainer (``X_Rep4``,
``MyTrainer_100epochs``) are answered on demand by :mod:`nnunet_selfreg.trainers.on_demand`.
"""

import importlib
import pkgutil

from nnunet_selfreg.trainers.core import define_trainers

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = define_trainers(globals())
del _module
