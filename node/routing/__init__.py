"""Routing: which studies run which models, at what priority, with results sent where.

Admins write an ordered list of rules (``rules.example.toml``); the first rule whose
conditions one image of the study meets decides. Rules are a versioned document in the
database (:mod:`node.routing.store`); a document with a mistake is refused whole.
"""
