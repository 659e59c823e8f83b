"""Transcriptions of the released code of every built-in reducer, in plain torch.

Each module here rewrites, in its own words, the selection logic of one method's released
repository (named in the function's docstring: repository, file, function) so that the fidelity
tests can run it on the same model and inputs as the lmmsqueeze reducer. Nothing here imports
lmmsqueeze.
"""
