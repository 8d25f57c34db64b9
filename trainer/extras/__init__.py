"""Opt-in features, one module each; the default run needs none of them (trainer/features.py).

Delete this folder and `configs/default.py` still trains and resumes; a config that asks for a
feature that is gone fails at start-up with one line naming it.
"""
