"""The built-in demo's synthetic data: seeded scenes of flat-coloured shapes and the queries
whose answers are unique in them (``prepare_synthetic.py`` writes both)."""
