//! What the agent and discovery agree on about ADS streams beyond the xDS protocol itself.
//!
//! Discovery ends every ADS stream after a jittered maximum age so that agents spread over
//! replicas again after one returns. The agent must tell that close from a replica failing:
//! after a failure it tries the other replicas first, after an aged close it dials in its usual
//! order (which may lead back to the replica that closed the stream, and should).

/// What the `UNAVAILABLE` status of a stream closed for its age says ([`is_aged_out`]).
pub const AGED_OUT_MARK: &str = "stream reached its maximum age";

/// The status discovery ends an aged stream with.
pub fn aged_out() -> tonic::Status {
    tonic::Status::unavailable(format!("{AGED_OUT_MARK}; reconnect"))
}

/// Whether discovery closed the stream because of its age (the replica is fine).
pub fn is_aged_out(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Unavailable && status.message().contains(AGED_OUT_MARK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_aged_out_close_is_told_from_other_unavailable_ones() {
        assert!(is_aged_out(&aged_out()));
        assert!(!is_aged_out(&tonic::Status::unavailable(
            "connection reset"
        )));
        assert!(!is_aged_out(&tonic::Status::internal(AGED_OUT_MARK)));
    }
}
