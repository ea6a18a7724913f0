{{/*
Names, labels, images and the pieces several templates share.
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "sharedsync.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The prefix of every object name: fullnameOverride, else "<release>-<chart>", or just the release
name when it already contains the chart name. Truncated so that "<fullname>-<suffix>" objects
stay within 63 characters for the suffixes used here.
*/}}
{{- define "sharedsync.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "sharedsync.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The CSI driver name: fixed, it must equal what the plugin reports in GetPluginInfo. */}}
{{- define "sharedsync.driverName" -}}csi.sharedsync.io{{- end -}}

{{/* Labels on every object. */}}
{{- define "sharedsync.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "sharedsync.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: sharedsync
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
Labels of one component: the common labels plus app.kubernetes.io/component.
Call with (dict "ctx" $ "component" "operator").
*/}}
{{- define "sharedsync.componentLabels" -}}
{{ include "sharedsync.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/*
Selector labels of one component's pods: never change them (a Deployment's selector is
immutable). Call with (dict "ctx" $ "component" "operator").
*/}}
{{- define "sharedsync.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sharedsync.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* ServiceAccount names of the three identities. */}}
{{- define "sharedsync.operatorServiceAccount" -}}{{ include "sharedsync.fullname" . }}-operator{{- end -}}
{{- define "sharedsync.agentServiceAccount" -}}{{ include "sharedsync.fullname" . }}-agent{{- end -}}
{{- define "sharedsync.controllerServiceAccount" -}}{{ include "sharedsync.fullname" . }}-csi-controller{{- end -}}

{{/*
A container's image and pull policy from an image value {repository, tag, pullPolicy}.
Call with (dict "image" .Values.image.csiProvisioner "default" "").
*/}}
{{- define "sharedsync.image" -}}
image: {{ printf "%s:%s" .image.repository (default .default .image.tag | toString) | quote }}
imagePullPolicy: {{ .image.pullPolicy }}
{{- end -}}

{{/* Our own image (tag defaults to the appVersion). */}}
{{- define "sharedsync.ourImage" -}}
{{ include "sharedsync.image" (dict "image" .Values.image.sharedsync "default" .Chart.AppVersion) }}
{{- end -}}

{{/*
Prefer spreading a component's pods over nodes, unless the user gave an affinity.
Call with (dict "ctx" $ "component" "operator" "affinity" .Values.operator.affinity).
*/}}
{{- define "sharedsync.affinity" -}}
{{- if .affinity -}}
affinity:
  {{- toYaml .affinity | nindent 2 }}
{{- else -}}
affinity:
  podAntiAffinity:
    preferredDuringSchedulingIgnoredDuringExecution:
      - weight: 100
        podAffinityTerm:
          topologyKey: kubernetes.io/hostname
          labelSelector:
            matchLabels:
              {{- include "sharedsync.selectorLabels" (dict "ctx" .ctx "component" .component) | nindent 14 }}
{{- end }}
{{- end -}}

{{/* The security context of the unprivileged containers (controller plugin, sidecars, operator). */}}
{{- define "sharedsync.restrictedContainer" -}}
securityContext:
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  runAsNonRoot: true
  capabilities:
    drop: [ALL]
{{- end -}}

{{/*
The sidecars of the node pods: root (the plugin's socket and kubelet's registration directory
belong to root) but without any capability or privilege escalation.
*/}}
{{- define "sharedsync.nodeSidecarContainer" -}}
securityContext:
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  runAsUser: 0
  capabilities:
    drop: [ALL]
{{- end -}}

{{/* The pod security context of the unprivileged pods (the image's user, see Dockerfile). */}}
{{- define "sharedsync.restrictedPod" -}}
securityContext:
  runAsNonRoot: true
  runAsUser: 10001
  runAsGroup: 10001
  fsGroup: 10001
  seccompProfile:
    type: RuntimeDefault
{{- end -}}

{{/* The privileged security context of the node plugin and the agent (mounts, loop devices, FUSE). */}}
{{- define "sharedsync.privilegedContainer" -}}
securityContext:
  privileged: true
  runAsUser: 0
  capabilities:
    add: [SYS_ADMIN]
{{- end -}}

{{/* The name of a SyncPolicy or StorageClass made from a key of syncPolicies.policies. */}}
{{- define "sharedsync.policyName" -}}
{{- printf "%s%s" .ctx.Values.syncPolicies.namePrefix .name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
ClusterRole (+ binding) and Role (+ binding) of a component, with exactly the rules of
rbac/<component>-cluster.yaml and rbac/<component>-namespace.yaml (one source: the
control-plane tests bind the same files). A file that does not exist gives no object.
Call with (dict "ctx" $ "component" "operator" "serviceAccount" "<name>").
*/}}
{{- define "sharedsync.componentRbac" -}}
{{- $ctx := .ctx -}}
{{- $name := printf "%s-%s" (include "sharedsync.fullname" $ctx) .component -}}
{{- $serviceAccount := .serviceAccount -}}
{{- $clusterRules := $ctx.Files.Get (printf "rbac/%s-cluster.yaml" .component) -}}
{{- if $clusterRules }}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: {{ $name }}
  labels:
    {{- include "sharedsync.componentLabels" (dict "ctx" $ctx "component" .component) | nindent 4 }}
  annotations:
    sharedsync.io/rules-from: {{ printf "rbac/%s-cluster.yaml" .component }}
rules:
  {{- $clusterRules | nindent 2 }}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: {{ $name }}
  labels:
    {{- include "sharedsync.componentLabels" (dict "ctx" $ctx "component" .component) | nindent 4 }}
subjects:
  - kind: ServiceAccount
    name: {{ $serviceAccount }}
    namespace: {{ $ctx.Release.Namespace }}
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: {{ $name }}
{{- end }}
{{- $namespaceRules := $ctx.Files.Get (printf "rbac/%s-namespace.yaml" .component) -}}
{{- if $namespaceRules }}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: {{ $name }}
  namespace: {{ $ctx.Release.Namespace }}
  labels:
    {{- include "sharedsync.componentLabels" (dict "ctx" $ctx "component" .component) | nindent 4 }}
  annotations:
    sharedsync.io/rules-from: {{ printf "rbac/%s-namespace.yaml" .component }}
rules:
  {{- $namespaceRules | nindent 2 }}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: {{ $name }}
  namespace: {{ $ctx.Release.Namespace }}
  labels:
    {{- include "sharedsync.componentLabels" (dict "ctx" $ctx "component" .component) | nindent 4 }}
subjects:
  - kind: ServiceAccount
    name: {{ $serviceAccount }}
    namespace: {{ $ctx.Release.Namespace }}
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: Role
  name: {{ $name }}
{{- end }}
{{- end -}}

{{/* The Secrets the agents and the operator read their certificates from. */}}
{{- define "sharedsync.agentTlsSecret" -}}
{{- if eq .Values.agentTls.mode "existingSecret" -}}
{{- required "agentTls.existingSecret is required with agentTls.mode existingSecret" .Values.agentTls.existingSecret -}}
{{- else -}}
{{- include "sharedsync.fullname" . }}-agent-tls
{{- end -}}
{{- end -}}

{{- define "sharedsync.operatorTlsSecret" -}}
{{- if eq .Values.agentTls.mode "existingSecret" -}}
{{- default (include "sharedsync.agentTlsSecret" .) .Values.agentTls.existingOperatorSecret -}}
{{- else -}}
{{- include "sharedsync.fullname" . }}-operator-tls
{{- end -}}
{{- end -}}

{{/* Where the certificate Secrets are mounted (keys ca.crt, tls.crt, tls.key). */}}
{{- define "sharedsync.tlsMountPath" -}}/var/run/secrets/sharedsync/tls{{- end -}}

{{/* The name every agent certificate carries (replication_agent/tls.py PEER_SERVER_NAME). */}}
{{- define "sharedsync.peerServerName" -}}agent.sharedsync.internal{{- end -}}

{{/* The name of the operator's client certificate the chart or cert-manager issues
(replication_agent/tls.py CONTROLLER_NAME). */}}
{{- define "sharedsync.operatorCertName" -}}sharedsync-operator{{- end -}}

{{/*
The certificate names the agents let call their control API over the network (agent config
controllerNames, as a JSON list): agentTls.controllerNames, plus the operator certificate the
chart issues; with existingSecret and no existingOperatorSecret the operator presents the
agents' own certificate, so its name must be listed too (and any agent may then call it).
*/}}
{{- define "sharedsync.controllerNames" -}}
{{- $names := .Values.agentTls.controllerNames | default list -}}
{{- if ne .Values.agentTls.mode "existingSecret" -}}
{{- $names = append $names (include "sharedsync.operatorCertName" .) -}}
{{- else if not .Values.agentTls.existingOperatorSecret -}}
{{- $names = append $names (include "sharedsync.peerServerName" .) -}}
{{- end -}}
{{- $names | uniq | toJson -}}
{{- end -}}
