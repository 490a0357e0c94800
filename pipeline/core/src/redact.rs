//! Hiding credentials before a URL is logged or shown.

/// Strips `user:password@` from a URL before it is shown; from each URL of a
/// comma-separated list (NATS servers).
pub fn redact_url(url: &str) -> String {
    if url.contains(',') {
        return url.split(',').map(|u| redact_url(u.trim())).collect::<Vec<_>>().join(",");
    }
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => format!("{}://***@{}", &url[..scheme], &url[at + 1..]),
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_server_of_a_list_is_redacted() {
        assert_eq!(
            redact_url("nats://u:p@10.0.0.1:4222, nats://u:p@10.0.0.2:4222,nats://10.0.0.3:4222"),
            "nats://***@10.0.0.1:4222,nats://***@10.0.0.2:4222,nats://10.0.0.3:4222"
        );
        assert_eq!(redact_url("postgres://a:b@h/db"), "postgres://***@h/db");
    }
}
