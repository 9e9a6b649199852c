"""What installers and owners run: provisioning, install, doctor, status views, the privacy report."""
