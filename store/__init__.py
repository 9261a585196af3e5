# Everything durable: the record format, the journal, the staging store, the dirty
# map, the hold and node identity, all in LMDB or beside it.
