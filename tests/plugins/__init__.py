"""Modules that register components as another project would, named in ``--model.plugins`` by the tests."""
