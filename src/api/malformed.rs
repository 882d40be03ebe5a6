//! Requests that do not decode: tonic answers them `INTERNAL` with its decoder's words ("failed
//! to decode Protobuf message: invalid varint"), which blames the broker for the caller's bytes,
//! trips alerts on `INTERNAL` and shows parser internals. This rewrites that answer to
//! `INVALID_ARGUMENT` with a message of its own, before the RPC metrics count it.

use http::HeaderValue;

/// The layer: apply with `tower::util::MapResponseLayer::new(hide_decode_errors)`.
pub fn hide_decode_errors<B>(mut response: http::Response<B>) -> http::Response<B> {
    let headers = response.headers_mut();
    let internal = headers.get("grpc-status").is_some_and(|v| v == "13");
    let decode = headers.get("grpc-message").is_some_and(|m| {
        let m = m.as_bytes();
        m.starts_with(b"failed%20to%20decode") || m.starts_with(b"failed to decode")
    });
    if internal && decode {
        headers.insert("grpc-status", HeaderValue::from_static("3"));
        headers.insert(
            "grpc-message",
            HeaderValue::from_static("the%20request%20message%20is%20not%20valid%20protobuf"),
        );
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: &str, message: &str) -> http::Response<()> {
        let mut r = http::Response::new(());
        r.headers_mut()
            .insert("grpc-status", HeaderValue::from_str(status).unwrap());
        r.headers_mut()
            .insert("grpc-message", HeaderValue::from_str(message).unwrap());
        r
    }

    #[test]
    fn only_decode_failures_are_rewritten() {
        let r = hide_decode_errors(answer(
            "13",
            "failed%20to%20decode%20Protobuf%20message:%20invalid%20varint",
        ));
        assert_eq!(r.headers()["grpc-status"], "3");
        assert!(
            !r.headers()["grpc-message"]
                .to_str()
                .unwrap()
                .contains("varint")
        );
        let r = hide_decode_errors(answer("13", "internal%20error"));
        assert_eq!(r.headers()["grpc-status"], "13");
        let r = hide_decode_errors(answer("5", "failed%20to%20decode"));
        assert_eq!(r.headers()["grpc-status"], "5");
    }
}
