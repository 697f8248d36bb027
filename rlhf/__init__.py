"""The small foundation the three packages share, so that each can stand on it without reaching into another:
`feedback` (preference data and judges) and `reward` (reward models) depend on nothing in `pipeline` (the staged
pipeline), and the pipeline builds on all of them.

    rlhf.errors   exceptions that end a command with a clear message and an exit code
    rlhf.io       atomic files: write a file (or JSON, JSON lines) so that a crash leaves the old one whole
    rlhf.yaml     YAML read as written (2e-5 is a number) and bounded (no alias bombs)
    rlhf.text     untrusted text kept text: special tokens in data, responses or requests neutralised

The import layers are written down in docs/design.md and checked by tests/unit/test_layers.py.
"""
