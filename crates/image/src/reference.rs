//! Image references as people write them (`python:3.12`, `ghcr.io/org/tool@sha256:…`,
//! `localhost:5000/app`), made whole: Docker Hub short names get `docker.io/library/`, a
//! reference without tag or digest gets `latest`.

use std::fmt;

/// The registry of references that name none.
pub const DEFAULT_REGISTRY: &str = "docker.io";

/// A whole image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// `docker.io`, `ghcr.io`, `localhost:5000`.
    pub registry: String,
    /// `library/python`, `org/tool`.
    pub repository: String,
    pub tag: Option<String>,
    /// `sha256:<64 hex>`.
    pub digest: Option<String>,
}

/// Why a reference could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{reference}` is not an image reference: {why}")]
pub struct ReferenceError {
    pub reference: String,
    pub why: String,
}

impl Reference {
    /// Reads a reference, filling in what people leave out.
    pub fn parse(text: &str) -> Result<Reference, ReferenceError> {
        let fail = |why: &str| ReferenceError {
            reference: text.to_string(),
            why: why.to_string(),
        };
        if text.is_empty() || text.len() > 4096 || text.chars().any(char::is_whitespace) {
            return Err(fail(
                "write one such as `python:3.12` or `ghcr.io/org/tool:1.0`",
            ));
        }
        let (rest, digest) = match text.split_once('@') {
            Some((rest, digest)) => (rest, Some(digest)),
            None => (text, None),
        };
        if let Some(d) = digest {
            let Some(hex) = d.strip_prefix("sha256:") else {
                return Err(fail("a digest is `sha256:` and 64 hex digits"));
            };
            if hex.len() != 64
                || !hex
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            {
                return Err(fail("a digest is `sha256:` and 64 lowercase hex digits"));
            }
        }
        // A tag is after the last `:` that comes after the last `/` (a `:` before it is a
        // registry's port).
        let slash = rest.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match rest[slash..].rfind(':') {
            Some(i) => (&rest[..slash + i], Some(&rest[slash + i + 1..])),
            None => (rest, None),
        };
        if let Some(t) = tag {
            let ok = !t.is_empty()
                && t.len() <= 128
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
                && !t.starts_with(['.', '-']);
            if !ok {
                return Err(fail("a tag is up to 128 letters, digits, `.`, `_` and `-`"));
            }
        }
        // The first component is a registry if it looks like a host: has a `.` or a `:`, or
        // is `localhost`.
        let (registry, path) = match name.split_once('/') {
            Some((first, path)) if first.contains(['.', ':']) || first == "localhost" => {
                (first.to_string(), path.to_string())
            }
            _ => (DEFAULT_REGISTRY.to_string(), name.to_string()),
        };
        if path.is_empty() {
            return Err(fail("it names no repository"));
        }
        let component_ok = |c: &str| {
            !c.is_empty()
                && c.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
                && c.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        };
        if !path.split('/').all(component_ok) {
            return Err(fail(
                "repository names are lowercase letters, digits, `.`, `_` and `-`, separated by `/`",
            ));
        }
        let repository = if registry == DEFAULT_REGISTRY && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        };
        let tag = match (tag, digest) {
            (Some(t), _) => Some(t.to_string()),
            (None, None) => Some("latest".to_string()),
            (None, Some(_)) => None,
        };
        Ok(Reference {
            registry,
            repository,
            tag,
            digest: digest.map(str::to_string),
        })
    }

    /// The registry's host and port, as a URL needs it (`registry-1.docker.io` for Docker Hub).
    pub fn registry_host(&self) -> &str {
        if self.registry == DEFAULT_REGISTRY {
            "registry-1.docker.io"
        } else {
            &self.registry
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn whole(text: &str) -> String {
        Reference::parse(text).unwrap().to_string()
    }

    #[test]
    fn short_names_are_docker_hub_library_images() {
        assert_eq!(whole("python:3.12"), "docker.io/library/python:3.12");
        assert_eq!(whole("python"), "docker.io/library/python:latest");
        assert_eq!(whole("bitnami/redis"), "docker.io/bitnami/redis:latest");
        assert_eq!(whole("docker.io/python:3"), "docker.io/library/python:3");
    }

    #[test]
    fn registries_ports_tags_and_digests() {
        assert_eq!(whole("ghcr.io/org/tool:1.0"), "ghcr.io/org/tool:1.0");
        assert_eq!(whole("localhost:5000/app"), "localhost:5000/app:latest");
        assert_eq!(whole("localhost/app:v2"), "localhost/app:v2");
        let digest = format!("sha256:{}", "a".repeat(64));
        let r = Reference::parse(&format!("ghcr.io/org/tool@{digest}")).unwrap();
        assert_eq!((r.tag, r.digest.as_deref()), (None, Some(digest.as_str())));
        let r = Reference::parse(&format!("alpine:3.20@{digest}")).unwrap();
        assert_eq!(r.tag.as_deref(), Some("3.20"));
        assert_eq!(r.registry_host(), "registry-1.docker.io");
    }

    #[test]
    fn malformed_references_say_what_is_wrong() {
        for bad in [
            "",
            "Python:3",
            "python:",
            "python:3 12",
            "ghcr.io/",
            "python@sha256:abc",
            "python@md5:0123",
            "a//b",
            "python:-x",
        ] {
            let err = Reference::parse(bad).unwrap_err();
            assert!(
                err.to_string().contains("is not an image reference"),
                "{bad}: {err}"
            );
        }
    }
}
