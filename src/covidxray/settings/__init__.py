"""Settings: every key a stage reads, checked once and returned as frozen values, one module per
stage (and `evaluate` for `covidxray validate` too), so a stage's settings import only what that
stage uses and its dvc.yaml deps stay its own.

No TensorFlow is imported here, so a bad value is reported in a second or two, before any model
code loads. Library functions take these values, never the whole config. Errors are one line
naming the key, what is allowed, and what was given.
"""
