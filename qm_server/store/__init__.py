"""Storage behind one interface (base.Store); sqlite.SqliteStore is the embedded default.

A second backend implements base.Store; tests/test_store_contract.py pins what the
interface promises. Start reading the SQLite store at sqlite.py: its docstring maps the
modules and tells the life of a write and the life of a claim.
"""
