# The primary's side: capture (the write-ahead front) and its data sets, syncs of
# the backing tree (resync, snapshot, touched, unsynced), recovery after a crash,
# the senders (sender, fanout, pacing), what the journal keeps for whom
# (retention), and --fsync remote (semisync).
