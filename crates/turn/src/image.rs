//! Making an image ready for sandboxes, and what commands in them start with: one way for
//! turns, `upstream exec` and the daemon.

use std::collections::BTreeMap;

use upstream_image::{ImageUser, PullError, PullProgress, Pulled};
use upstream_sandbox::Image;

use crate::ImageSource;

/// The environment every command starts from: a step, `upstream exec` and a command over
/// HTTP alike. The image's user and environment come on top ([`Prepared::env`]).
pub const BASE_ENV: &[(&str, &str)] = &[
    (
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ),
    ("HOME", "/root"),
    ("USER", "root"),
    ("LANG", "C.UTF-8"),
    ("TERM", "dumb"),
    ("UPSTREAM", "1"),
];

/// Why an image could not be made ready.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// The name is not an image reference.
    #[error("image `{image}`: {why}")]
    Reference { image: String, why: String },
    /// Nothing to pull it with.
    #[error("cannot run image `{image}`: this upstream has no image cache configured")]
    NoCache { image: String },
    #[error("cannot run image `{image}`: {source}")]
    Pull { image: String, source: PullError },
    /// The image's configuration names what its files do not have (a user, say).
    #[error("cannot run image `{image}`: {reason}")]
    Config { image: String, reason: String },
}

/// An image ready to make sandboxes from.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// What a [`upstream_sandbox::SandboxSpec`] names.
    pub image: Image,
    /// The pull that made it ready; `None` for the host's image.
    pub pulled: Option<Pulled>,
    /// The image's user, whom commands run as where the sandbox has its ids; `None`: root.
    pub user: Option<ImageUser>,
}

/// Makes the image `name` ready: `host`, or a reference found in the cache or pulled into
/// it (`progress` hears of its layers).
pub fn prepare(
    name: &str,
    source: Option<&ImageSource>,
    progress: &mut dyn PullProgress,
) -> Result<Prepared, PrepareError> {
    if name == "host" {
        return Ok(Prepared {
            image: Image::Host,
            pulled: None,
            user: None,
        });
    }
    let reference =
        upstream_image::Reference::parse(name).map_err(|e| PrepareError::Reference {
            image: name.to_string(),
            why: e.why,
        })?;
    let Some(source) = source else {
        return Err(PrepareError::NoCache {
            image: name.to_string(),
        });
    };
    progress.starting();
    let pulled = upstream_image::pull(&reference, &source.cache, &source.pull, progress).map_err(
        |source| PrepareError::Pull {
            image: name.to_string(),
            source,
        },
    )?;
    let user = pulled
        .config
        .user(&pulled.rootfs)
        .map_err(|reason| PrepareError::Config {
            image: name.to_string(),
            reason,
        })?;
    Ok(Prepared {
        image: Image::Layers {
            reference: name.to_string(),
            layers: vec![pulled.rootfs.clone()],
        },
        pulled: Some(pulled),
        user,
    })
}

impl Prepared {
    /// Where commands start unless told otherwise: the image's working directory, else
    /// `/workspace`.
    pub fn workdir(&self) -> String {
        self.pulled
            .as_ref()
            .and_then(|p| p.config.working_dir.clone())
            .unwrap_or_else(|| upstream_doc::front_matter::DEFAULT_WORKDIR.to_string())
    }

    /// The image's own environment.
    pub fn image_env(&self) -> &[(String, String)] {
        self.pulled.as_ref().map_or(&[], |p| &p.config.env)
    }

    /// Whom commands run as in a sandbox that has `ids` user and group ids from 0
    /// ([`upstream_sandbox::SandboxInfo::ids`]): the image's user when the sandbox has its
    /// ids, else root with a warning that says so (a rootless sandbox maps only its root).
    pub fn user_in(&self, ids: u32) -> (Option<ImageUser>, Option<String>) {
        match &self.user {
            Some(u) if u.uid >= ids || u.gid >= ids => (
                None,
                Some(format!(
                    "the image's user {} ({}:{}) does not exist in a rootless sandbox, which \
                     maps only its root; commands run as root",
                    u.name, u.uid, u.gid
                )),
            ),
            user => (user.clone(), None),
        }
    }

    /// What every command starts with, as `user` (`None`: root): [`BASE_ENV`], the user's
    /// home and name, then the image's environment.
    pub fn env(&self, user: Option<&ImageUser>) -> BTreeMap<String, String> {
        let mut env: BTreeMap<String, String> = BASE_ENV
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        if let Some(user) = user {
            env.insert("HOME".into(), user.home.clone());
            env.insert("USER".into(), user.name.clone());
        }
        for (k, v) in self.image_env() {
            env.insert(k.clone(), v.clone());
        }
        env
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_user(uid: u32) -> Prepared {
        Prepared {
            image: Image::Host,
            pulled: None,
            user: Some(ImageUser {
                uid,
                gid: uid,
                name: "app".into(),
                home: "/home/app".into(),
            }),
        }
    }

    #[test]
    fn the_host_image_needs_no_cache_and_starts_in_the_workspace() {
        let prepared = prepare("host", None, &mut upstream_image::NoProgress).unwrap();
        assert_eq!(prepared.image, Image::Host);
        assert_eq!(prepared.workdir(), "/workspace");
        assert!(prepared.user.is_none());
    }

    #[test]
    fn an_image_without_a_cache_or_with_a_bad_name_is_refused_by_name() {
        let e = prepare("python:3.12", None, &mut upstream_image::NoProgress).unwrap_err();
        assert!(matches!(e, PrepareError::NoCache { .. }), "{e}");
        assert!(e.to_string().contains("python:3.12"), "{e}");
        let e = prepare("Not An Image", None, &mut upstream_image::NoProgress).unwrap_err();
        assert!(matches!(e, PrepareError::Reference { .. }), "{e}");
    }

    #[test]
    fn the_users_home_and_name_replace_roots_and_the_image_env_comes_last() {
        let prepared = with_user(1000);
        let (user, warning) = prepared.user_in(65536);
        assert!(warning.is_none());
        let env = prepared.env(user.as_ref());
        assert_eq!(env["HOME"], "/home/app");
        assert_eq!(env["USER"], "app");
        assert_eq!(env["LANG"], "C.UTF-8");
        assert_eq!(env["UPSTREAM"], "1");
        let root = prepared.env(None);
        assert_eq!(root["HOME"], "/root");
        assert_eq!(root["USER"], "root");
        // The image's own settings win over the base and the user's.
        let mut prepared = prepared;
        prepared.pulled = Some(Pulled {
            digest: "sha256:00".into(),
            rootfs: "/nonexistent".into(),
            config: upstream_image::ImageConfig {
                env: vec![
                    ("LANG".into(), "fr_FR.UTF-8".into()),
                    ("HOME".into(), "/srv".into()),
                ],
                working_dir: Some("/app".into()),
                user: None,
            },
            layers: 1,
            downloaded: 0,
        });
        let env = prepared.env(user.as_ref());
        assert_eq!(
            (env["LANG"].as_str(), env["HOME"].as_str()),
            ("fr_FR.UTF-8", "/srv")
        );
        assert_eq!(env["USER"], "app");
        assert_eq!(prepared.workdir(), "/app");
    }

    #[test]
    fn a_user_the_sandbox_has_no_id_for_runs_as_root_with_a_warning() {
        let prepared = with_user(1000);
        let (user, warning) = prepared.user_in(1);
        assert!(user.is_none());
        assert!(warning.unwrap().contains("app (1000:1000)"));
        // The control: the sandbox that has the id runs the user.
        assert_eq!(prepared.user_in(1001).0.unwrap().uid, 1000);
        assert!(
            prepared.user_in(1000).0.is_none(),
            "uid 1000 needs 1001 ids"
        );
    }
}
