//! Metadata on the wire: an `http::HeaderMap` as `CallHeader`s and back.
//!
//! Pseudo-headers do not exist in a `HeaderMap`, and the method and path
//! travel in `CallStart`, so every entry crosses as it is. What comes off
//! the wire is checked: a name or value that HTTP/2 would refuse is
//! refused here too.

use http::header::{HeaderMap, HeaderName, HeaderValue};

use crate::v1::CallHeader;

/// Why metadata from the peer was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    #[error("metadata name {0:?} is not a valid header name")]
    Name(String),
    #[error("the value of metadata `{0}` is not a valid header value")]
    Value(String),
}

/// `headers` as wire entries, in the map's order.
pub fn to_wire(headers: &HeaderMap) -> Vec<CallHeader> {
    headers
        .iter()
        .map(|(name, value)| CallHeader {
            name: name.as_str().to_owned(),
            value: value.as_bytes().to_vec(),
        })
        .collect()
}

/// Wire entries as a header map.
pub fn from_wire(entries: Vec<CallHeader>) -> Result<HeaderMap, HeaderError> {
    let mut headers = HeaderMap::with_capacity(entries.len());
    for entry in entries {
        let name = HeaderName::from_bytes(entry.name.as_bytes())
            .map_err(|_| HeaderError::Name(entry.name.clone()))?;
        let value =
            HeaderValue::from_bytes(&entry.value).map_err(|_| HeaderError::Value(entry.name))?;
        headers.append(name, value);
    }
    Ok(headers)
}

/// The trailers that end a call with `status`.
pub fn status_trailers(status: &tonic::Status) -> Vec<CallHeader> {
    let mut headers = HeaderMap::new();
    // Writing a status's headers only fails for metadata it cannot encode;
    // what is left (code and message) is what matters.
    let _ = status.add_header(&mut headers);
    to_wire(&headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_survives_the_round_trip_repeated_keys_included() {
        let mut headers = HeaderMap::new();
        headers.insert("grpc-timeout", HeaderValue::from_static("250m"));
        headers.append("x-role", HeaderValue::from_static("web"));
        headers.append("x-role", HeaderValue::from_static("db"));
        headers.insert("trace-bin", HeaderValue::from_static("AAEC"));
        let back = from_wire(to_wire(&headers)).expect("valid");
        assert_eq!(back, headers);
    }

    #[test]
    fn names_and_values_http2_would_refuse_are_refused() {
        let name = vec![CallHeader {
            name: "Bad Name".into(),
            value: b"x".to_vec(),
        }];
        assert_eq!(from_wire(name), Err(HeaderError::Name("Bad Name".into())));
        let value = vec![CallHeader {
            name: "x-ok".into(),
            value: b"line\nbreak".to_vec(),
        }];
        assert_eq!(from_wire(value), Err(HeaderError::Value("x-ok".into())));
    }
}
