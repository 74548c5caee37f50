import os

# Tests never reach the Hub; the local Hub server tests switch this off for themselves.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
