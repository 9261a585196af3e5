# Fibre Channel over FCIP (RFC 3821): FC-2 frames (frame), their TCP encapsulation (fcip),
# link services and FC-SP authentication (els), FCP (fcp), the logins (login), the
# target (target) and initiator (initiator) ports, and the primary's dialer (link).
