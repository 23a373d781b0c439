from ds_rlhf.cli import entry

entry()
