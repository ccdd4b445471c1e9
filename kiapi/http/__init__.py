"""HTTP plumbing around Connexion: validators, error mapping, streaming uploads, docs pages."""
