"""dicomrouter: a store-and-forward DICOM router.

The package layout follows the pipeline::

    receive -> store (files + index) -> rules -> queue -> dispatch -> destinations

with ``config`` shared by every stage and ``cli`` at the edge (docs/architecture.md,
*Layers*, has the exact table).
"""

__version__ = "0.1.0"
