"""The built-in demo's synthetic data: seeded scenes of flat-coloured shapes, the queries whose
answers are unique in them, and multi-round conversations whose later rounds name an earlier
round's object (``prepare_synthetic.py`` writes them)."""
