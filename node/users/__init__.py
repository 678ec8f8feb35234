"""Web users: accounts, roles and password hashes."""
