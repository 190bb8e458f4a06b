"""Phone calls over the Twilio Media Streams protocol (docs/phone.md)."""
