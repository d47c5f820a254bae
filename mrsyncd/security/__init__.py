"""
Who may do what: the certificate authority and its certificates (roles,
tags, revocation) and the TLS contexts every control connection uses.
"""
