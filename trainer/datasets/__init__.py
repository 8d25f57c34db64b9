"""Offline datasets that ship with tfscale as TFDS builders."""
