"""Command line edge (typer + rich).

``cli.main`` imports every command module to build the app, and ``dicomrouter
serve`` becomes the node process, which must not load numpy (see
``children.exclude_pixel_libraries``). pydicom imports numpy whenever it is
installed, and ``store``, ``rules``, ``queue``, ``control``, ``retention`` and
``destinations`` all load pydicom. So the command modules import those packages
inside the command functions, after the process knows what it is; at module level
they import only ``config`` (pydantic, no pydicom). tests/test_layers.py lists these
function-level imports and refuses any other.
"""
