# SCSI as the replfs LUN speaks it, whatever carries it (iSCSI, FCP): the command set
# and layout (spc), the LUN at the secondary (lun), the primary's link (link).
