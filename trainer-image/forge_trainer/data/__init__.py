"""Data: the sources (files and their documents), preparation (tokenizer, cached token shards) and
the packed pretraining loader."""
