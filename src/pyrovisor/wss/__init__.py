"""Working sets measured from the host, trusting nothing the guest says (sampling with userfaultfd)."""
