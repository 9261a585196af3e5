# replfs node: the node and its daemons (node, child), the cluster's keys in etcd
# (etcd, members), the lease and the election of the primary.
