"""iSCSI target (RFC 7143) on the same ``Volume`` interface as NBD: a sans-IO PDU codec and
connection core, a SCSI command layer (SPC-4/SBC-3) and a thin asyncio server."""
