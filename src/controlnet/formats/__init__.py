"""Key maps between our (original LDM) layout and other layouts, as explicit, tested tables.

Every function here is a pure ``dict -> dict`` over tensors: no copies beyond the reshapes, splits
and concatenations a layout needs, so a round trip is bit-identical.
"""
