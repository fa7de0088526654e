"""Shared contracts: what the site, the warehouse and researchers all rely on.

- `layout`: the raw upload and processed layouts (key builders and parsers, pseudonym and UID shapes);
- `dicom`: reading a complete DICOM file or its header, with a named reason for every file that cannot be filed.

Both rooms that move data (`site/` and `warehouse/`) depend on these; these depend on no room.
"""
