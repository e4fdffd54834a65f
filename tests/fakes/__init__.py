"""Fake providers: real local servers speaking each provider's wire protocol.

``fcm`` (HTTP v1 + its OAuth token endpoint), ``apns`` (HTTP/2 with prior knowledge),
``webpush`` (decrypts every ``aes128gcm`` body with the subscription's private key),
``twilio`` (form, basic auth) and ``smtp`` (aiosmtpd). Each is started with
``async with Fake...().running() as fake`` on a free loopback port and closed after; each
shares ``ledger.Behaviour`` (error rate, timeouts, latency, Retry-After, dead targets,
scripted answers) and ``ledger.Ledger`` (what it accepted per ``Idempotency-Key``).
"""
