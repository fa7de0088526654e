"""The central warehouse: layout, split rules, loader, metadata export, catalog and run reports."""
