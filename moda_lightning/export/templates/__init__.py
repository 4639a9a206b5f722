"""The transformers entry points of an exported folder (``configuration_moda``, ``modeling_moda``).

They import the package like any module of it; ``moda_lightning.export.bundle`` copies them, and
every module they reach, into the folder with the imports rewritten. Importing them needs
transformers.
"""
