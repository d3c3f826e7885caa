"""ReCoKD: Region- and Context-aware Knowledge Distillation for 3D medical segmentation.

The library behind the ``recokd`` command and the 3D Slicer module. Importing it is cheap: no
torch, no Qt, no Slicer; each submodule imports what it needs.

Layers (a module imports only from the layers below it):

1. ``data``, ``networks``, ``losses``, ``checkpoint``, ``progress``, ``choices``: field primitives.
2. ``teachers``, ``taps``: models in use (loading, feature hooks, adapters).
3. ``engine``, ``infer``, ``batch``, ``export``: the jobs.
4. ``evaluate``, ``inspection``: reading results (metrics, reports, the maps a KD loss uses).
5. ``mrml``: the MRML bridge, the only module that imports ``slicer``.
6. ``demo``, ``cli`` and ``commands``: the main job and the ``recokd`` command.
"""

__version__ = "0.1.0"
